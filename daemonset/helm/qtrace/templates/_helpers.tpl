{{- define "qtrace.fullname" -}}
{{- if contains "qtrace" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-qtrace" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "qtrace.labels" -}}
app.kubernetes.io/name: qtrace
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{/* The environment variable prefix Kubernetes gives the collector Service. */}}
{{- define "qtrace.collectorEnv" -}}
{{- printf "%s-collector" (include "qtrace.fullname" .) | upper | replace "-" "_" -}}
{{- end -}}
