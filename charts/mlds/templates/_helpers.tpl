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

{{/*
A repository with global.imageRegistry in place of its registry (the first path part when it looks like a
host: it has a dot or a port, or is localhost). Call with (list $ "ghcr.io/mlds/worker").
*/}}
{{- define "mlds.repository" -}}
{{- $root := index . 0 }}
{{- $repository := index . 1 }}
{{- $registry := (($root.Values.global | default dict).imageRegistry | default "") | trimSuffix "/" }}
{{- if $registry }}
{{- $parts := splitList "/" $repository }}
{{- $first := first $parts }}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) }}
{{- $repository = join "/" (rest $parts) }}
{{- end }}
{{- printf "%s/%s" $registry $repository }}
{{- else }}
{{- $repository }}
{{- end }}
{{- end }}

{{/*
Pull secrets as a YAML list of {name: ...}: global.imagePullSecrets, then the given list (names or objects),
without repeats. Call with (list $ .Values.operator.imagePullSecrets).
*/}}
{{- define "mlds.pullSecrets" -}}
{{- $root := index . 0 }}
{{- $names := list }}
{{- range concat (($root.Values.global | default dict).imagePullSecrets | default list) (index . 1 | default list) }}
{{- $name := . }}
{{- if kindIs "map" . }}{{ $name = .name }}{{ end }}
{{- $names = append $names $name }}
{{- end }}
{{- range uniq $names }}
- name: {{ . }}
{{- end }}
{{- end }}

{{/* The operator image: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "mlds.operatorImage" -}}
{{- $image := .Values.operator.image }}
{{- $repository := include "mlds.repository" (list . $image.repository) }}
{{- if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion $image.tag) }}
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
{{- $repository := include "mlds.repository" (list $root $workers.image.repository) }}
{{- printf "%s:%s-%s" $repository (default $root.Chart.AppVersion $workers.image.tag) $flavour }}
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

{{/*
The worker pod defaults as `mlds operator --worker-pod-defaults` reads them (JSON): workers.pod with the
global pull secrets first, and workers.acceleratorPod per accelerator (the operator merges them; the rule
is in values.yaml).
*/}}
{{- define "mlds.workerPodDefaults" -}}
{{- $all := deepCopy .Values.workers.pod }}
{{- $_ := set $all "imagePullSecrets" (include "mlds.pullSecrets" (list . .Values.workers.pod.imagePullSecrets) | fromYamlArray) }}
{{- $out := dict "all" $all }}
{{- range $accelerator := list "cpu" "nvidia" "rocm" }}
{{- $_ := set $out $accelerator (index $.Values.workers.acceleratorPod $accelerator | default dict) }}
{{- end }}
{{- toJson $out }}
{{- end }}
