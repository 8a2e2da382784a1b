import os

# gRPC's C core logs each failed TLS handshake on stderr, before qtrace can say in one line
# what is wrong; GRPC_VERBOSITY=INFO brings those lines back. Set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
