{{/*
Standard name and label helpers (the `helm create` conventions).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "mlds.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's name prefix: fullnameOverride, else the release name when it already contains the chart
name, else <release>-<chart>. Cut to 54 characters so that "<fullname>-operator" fits 63.
*/}}
{{- define "mlds.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the operator's Deployment, Service and (by default) ServiceAccount. */}}
{{- define "mlds.operatorName" -}}
{{- printf "%s-operator" (include "mlds.fullname" .) }}
{{- end }}

{{- define "mlds.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "mlds.labels" -}}
helm.sh/chart: {{ include "mlds.chart" . }}
{{ include "mlds.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mlds
{{- end }}

{{/* Labels that select the operator pod (immutable in a Deployment: never add to them). */}}
{{- define "mlds.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mlds.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mlds.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mlds.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "mlds.operatorImage" -}}
{{- $image := .Values.operator.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
The worker image of one accelerator: workers.images.<accelerator>, else <repository>:<tag>-<flavour>
(flavour: cpu, cuda, rocm; one image per torch build). Call with (list $ "nvidia" "cuda").
*/}}
{{- define "mlds.workerImage" -}}
{{- $root := index . 0 }}
{{- $accelerator := index . 1 }}
{{- $flavour := index . 2 }}
{{- $workers := $root.Values.workers }}
{{- $explicit := index $workers.images $accelerator }}
{{- if $explicit }}
{{- $explicit }}
{{- else }}
{{- printf "%s:%s-%s" $workers.image.repository (default $root.Chart.AppVersion $workers.image.tag) $flavour }}
{{- end }}
{{- end }}

{{/* The lease API as workers reach it. */}}
{{- define "mlds.leaseUrl" -}}
{{- if .Values.leaseUrl }}
{{- .Values.leaseUrl | trimSuffix "/" }}
{{- else }}
{{- printf "http://%s.%s.svc:%v" (include "mlds.operatorName" .) .Release.Namespace .Values.service.port }}
{{- end }}
{{- end }}
