{{/* Names and labels shared by every template. */}}

{{- define "strata.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* vLLM's StatefulSet and its headless Service share this name: pods are <name>-N.<name>. */}}
{{- define "strata.vllm.name" -}}
{{- printf "%s-vllm" (include "strata.fullname" .) | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "strata.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "strata.labels" -}}
{{ include "strata.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "strata.gateway.selectorLabels" -}}
{{ include "strata.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "strata.vllm.selectorLabels" -}}
{{ include "strata.selectorLabels" . }}
app.kubernetes.io/component: engine
{{- end -}}

{{/* The engines the gateway talks to, comma-separated: each vLLM pod by its stable DNS name. */}}
{{- define "strata.engineUrls" -}}
{{- if .Values.vllm.enabled -}}
{{- $name := include "strata.vllm.name" . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.vllm.replicas) -}}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc.%s:%d" $name $i $name $.Release.Namespace $.Values.clusterDomain (int $.Values.vllm.port)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- else -}}
{{- if not .Values.engines -}}
{{- fail "vllm.enabled is false: list the engines' URLs in `engines`" -}}
{{- end -}}
{{- join "," .Values.engines -}}
{{- end -}}
{{- end -}}

{{/* An image reference; values.schema.json has already refused an empty or `latest` tag. */}}
{{- define "strata.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
