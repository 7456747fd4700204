{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "device-api-server.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "device-api-server.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the metrics Service; it is also the Prometheus `job` label of the scrape. */}}
{{- define "device-api-server.metricsServiceName" -}}
{{- printf "%s-metrics" (include "device-api-server.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "device-api-server.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "device-api-server.selectorLabels" -}}
app.kubernetes.io/name: {{ include "device-api-server.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "device-api-server.labels" -}}
helm.sh/chart: {{ include "device-api-server.chart" . }}
{{ include "device-api-server.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: device-api-server
app.kubernetes.io/part-of: device-api
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "device-api-server.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "device-api-server.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Server image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "device-api-server.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "device-api-server.sidecarImage" -}}
{{- $img := .Values.nvml.sidecar.image }}
{{- if or $img.repository $img.tag }}
{{- printf "%s:%s" (default .Values.image.repository $img.repository) (default (default .Chart.AppVersion .Values.image.tag) $img.tag) }}
{{- else }}
{{- include "device-api-server.image" . }}
{{- end }}
{{- end }}

{{/* Directory of the unix socket (the hostPath mounted at the same path). */}}
{{- define "device-api-server.socketDir" -}}
{{- dir .Values.server.unixSocket }}
{{- end }}

{{/*
hostPath directories of the server's sockets as JSON {"dirs": [{"name", "path"}]}: the gRPC
socket's (volume socket-dir), then the upstream API's and the platform connector's when they are
on. Sockets in the same directory share one volume (a path may be mounted only once).
*/}}
{{- define "device-api-server.socketDirs" -}}
{{- $main := dir .Values.server.unixSocket }}
{{- $dirs := list (dict "name" "socket-dir" "path" $main) }}
{{- $seen := list $main }}
{{- $extra := list }}
{{- if .Values.nvsentinelApi.enabled }}
{{- $extra = append $extra (dict "name" "nvsentinel-api-socket-dir" "path" (dir .Values.nvsentinelApi.socket)) }}
{{- end }}
{{- if .Values.platformConnector.enabled }}
{{- $extra = append $extra (dict "name" "platform-connector-socket-dir" "path" (dir .Values.platformConnector.socket)) }}
{{- end }}
{{- range $extra }}
{{- if not (has .path $seen) }}
{{- $dirs = append $dirs . }}
{{- $seen = append $seen .path }}
{{- end }}
{{- end }}
{{- toJson (dict "dirs" $dirs) }}
{{- end }}

{{/*
Effective settings of monitoring.<kind> (serviceMonitor or prometheusRule) as JSON: the
monitoring.<kind> values overlaid, key by key, with metrics.<kind> (the upstream chart's name for
the same object, which its operations guide sets). Maps (`for`, `labels`) merge one level down.
Usage: include "device-api-server.monitoring" (list . "serviceMonitor") | fromJson
*/}}
{{- define "device-api-server.monitoring" -}}
{{- $root := index . 0 }}
{{- $kind := index . 1 }}
{{- $merged := deepCopy (index $root.Values.monitoring $kind) }}
{{- $alias := dig $kind (dict) (deepCopy $root.Values.metrics) }}
{{- range $key, $value := $alias }}
{{- if and (kindIs "map" $value) (kindIs "map" (get $merged $key)) }}
{{- $_ := set $merged $key (mergeOverwrite (get $merged $key) $value) }}
{{- else }}
{{- $_ := set $merged $key $value }}
{{- end }}
{{- end }}
{{- toJson $merged }}
{{- end }}

{{/* True ("true") when NVML runs in either mode; the pod then needs the NVIDIA runtime. */}}
{{- define "device-api-server.nvmlOn" -}}
{{- if or .Values.nvml.enabled .Values.nvml.sidecar.enabled }}true{{ end }}
{{- end }}

{{/*
Grace period: the server's own shutdown (not-ready for shutdownDelay, then up to shutdownTimeout
for in-flight calls, then cleanup) plus 5 s of margin, plus the optional preStop sleep.
*/}}
{{- define "device-api-server.terminationGracePeriodSeconds" -}}
{{- $s := .Values.server }}
{{- $grace := add (ceil $s.shutdownDelay) (ceil $s.shutdownTimeout) 5 }}
{{- if .Values.lifecycle.preStopSleep }}
{{- $grace = add $grace (ceil $s.shutdownDelay) }}
{{- end }}
{{- $grace }}
{{- end }}

{{/* Memory limit in bytes from a Kubernetes quantity (plain, Ki/Mi/Gi/Ti, k/M/G/T); 0 if unset. */}}
{{- define "device-api-server.memoryLimitBytes" -}}
{{- $q := toString (dig "limits" "memory" "" .Values.resources) }}
{{- $bytes := 0 }}
{{- if $q }}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 }}
{{- $matched := false }}
{{- range $suffix := list "Ki" "Mi" "Gi" "Ti" "k" "M" "G" "T" }}
{{- if and (not $matched) (hasSuffix $suffix $q) }}
{{- $bytes = mulf (float64 (trimSuffix $suffix $q)) (get $units $suffix) }}
{{- $matched = true }}
{{- end }}
{{- end }}
{{- if not $matched }}
{{- $bytes = float64 $q }}
{{- end }}
{{- end }}
{{- int64 $bytes }}
{{- end }}

{{/* Label matchers selecting this release's scrape job in PromQL. */}}
{{- define "device-api-server.promSelector" -}}
job="{{ include "device-api-server.metricsServiceName" . }}",namespace="{{ .Release.Namespace }}"
{{- end }}

{{/* A number as a flag value: integers without exponent (YAML numbers arrive as float64). */}}
{{- define "device-api-server.num" -}}
{{- if eq (float64 .) (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* The server's command-line flags, one per line (each a real flag of device-api-server). */}}
{{- define "device-api-server.args" -}}
{{- $s := .Values.server -}}
- {{ printf "--grpc-address=%v" $s.grpcAddress | quote }}
- {{ printf "--unix-socket=%v" $s.unixSocket | quote }}
- --health-port={{ int64 $s.healthPort }}
- --metrics-port={{ int64 $s.metricsPort }}
- --shutdown-timeout={{ include "device-api-server.num" $s.shutdownTimeout }}
- --shutdown-delay={{ include "device-api-server.num" $s.shutdownDelay }}
- {{ printf "--log-format=%v" $s.logFormat | quote }}
- --verbosity={{ int64 $s.verbosity }}
- --min-gpus={{ int64 $s.minGpus }}
- --provider-timeout={{ include "device-api-server.num" $s.providerTimeout }}
- --heartbeat-timeout={{ include "device-api-server.num" $s.heartbeatTimeout }}
- --max-gpus={{ int64 $s.maxGpus }}
- --max-conditions={{ int64 $s.maxConditions }}
- --max-object-bytes={{ int64 $s.maxObjectBytes }}
- --max-receive-message-bytes={{ int64 $s.maxReceiveMessageBytes }}
- --max-concurrent-streams={{ int64 $s.maxConcurrentStreams }}
- --max-watchers={{ int64 $s.maxWatchers }}
- --watch-queue={{ int64 $s.watchQueue }}
- --watch-history={{ int64 $s.watchHistory }}
- --slow-subscriber-timeout={{ include "device-api-server.num" $s.slowSubscriberTimeout }}
- --subscribe-rate={{ include "device-api-server.num" $s.subscribeRate }}
- --subscribe-burst={{ int64 $s.subscribeBurst }}
{{- with $s.healthAddress }}
- {{ printf "--health-address=%v" . | quote }}
{{- end }}
{{- with $s.metricsAddress }}
- {{ printf "--metrics-address=%v" . | quote }}
{{- end }}
{{- if .Values.nvsentinelApi.enabled }}
- {{ printf "--nvsentinel-api-socket=%v" .Values.nvsentinelApi.socket | quote }}
{{- end }}
{{- if .Values.platformConnector.enabled }}
- {{ printf "--platform-connector-socket=%v" .Values.platformConnector.socket | quote }}
{{- end }}
{{- with $s.problemConditions }}
- {{ printf "--problem-conditions=%v" (kindIs "slice" . | ternary (join "," .) .) | quote }}
{{- end }}
{{- if gt (int64 $s.simulate) 0 }}
- --simulate={{ int64 $s.simulate }}
{{- end }}
{{- if .Values.nvml.enabled }}
- --enable-nvml-provider=true
{{- include "device-api-server.nvmlArgs" . }}
- --nvml-recovery-quiet-period={{ include "device-api-server.num" .Values.nvml.recoveryQuietPeriod }}
{{- end }}
{{- range $s.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* NVML flags shared by the embedded provider and the sidecar. */}}
{{/*
nvml.healthCheck as "true"/"false"; the upstream chart's name nvml.healthCheckEnabled (an alias
documented in values.schema.json) wins when set.
*/}}
{{- define "device-api-server.nvmlHealthCheck" -}}
{{- $n := .Values.nvml }}
{{- ternary $n.healthCheckEnabled $n.healthCheck (hasKey $n "healthCheckEnabled") | toString }}
{{- end }}

{{- define "device-api-server.nvmlArgs" -}}
{{- $n := .Values.nvml }}
{{- /* the upstream chart's names, documented as aliases in values.schema.json, win when set */}}
{{- $healthCheck := include "device-api-server.nvmlHealthCheck" . }}
{{- $ignored := ternary $n.additionalIgnoredXids $n.ignoredXids (hasKey $n "additionalIgnoredXids") }}
- {{ printf "--nvml-driver-root=%v" $n.driverRoot | quote }}
- --nvml-health-check={{ $healthCheck }}
{{- if $ignored }}
- {{ printf "--nvml-ignored-xids=%v" $ignored | quote }}
{{- end }}
{{- if $n.criticalXids }}
- {{ printf "--nvml-critical-xids=%v" $n.criticalXids | quote }}
{{- end }}
{{- end }}
