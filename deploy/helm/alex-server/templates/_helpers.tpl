{{/* Names and labels. */}}

{{- define "alex-server.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "alex-server.fullname" -}}
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

{{- define "alex-server.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "alex-server.selectorLabels" -}}
app.kubernetes.io/name: {{ include "alex-server.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "alex-server.labels" -}}
helm.sh/chart: {{ include "alex-server.chart" . }}
{{ include "alex-server.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: alex-server
{{- end }}

{{- define "alex-server.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "alex-server.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "alex-server.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Where things come from. */}}

{{- define "alex-server.redisEnabled" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{/* "true" when more than one pod may run at once (several replicas, or an autoscaler). */}}
{{- define "alex-server.scaledOut" -}}
{{- if or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled }}true{{ end }}
{{- end }}

{{/* The Secret the chart writes holds whichever secrets were given as values. */}}
{{- define "alex-server.chartSecret" -}}
{{- if or .Values.llm.apiKey .Values.auth.jwtSecret .Values.redis.url }}true{{ end }}
{{- end }}

{{- define "alex-server.terminationGracePeriodSeconds" -}}
{{- $floor := add .Values.shutdown.preStopSleepSeconds .Values.shutdown.graceSeconds 5 }}
{{- if kindIs "invalid" .Values.shutdown.terminationGracePeriodSeconds }}
{{- add .Values.shutdown.preStopSleepSeconds .Values.shutdown.graceSeconds 10 }}
{{- else if lt (int .Values.shutdown.terminationGracePeriodSeconds) (int $floor) }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds=%v is too short: the preStop sleep (%v s) and the drain (shutdown.graceSeconds=%v s) need at least %v s, or the kubelet kills running tasks before they are stored as interrupted" .Values.shutdown.terminationGracePeriodSeconds .Values.shutdown.preStopSleepSeconds .Values.shutdown.graceSeconds $floor) }}
{{- else }}
{{- .Values.shutdown.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
Checks that need more than one value at a time; the schema checks each value alone. Included by every manifest
that depends on them, so that `helm template` and `helm install` stop with one clear line.
*/}}
{{- define "alex-server.validate" -}}
{{- $redis := include "alex-server.redisEnabled" . }}
{{- if and (not $redis) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount=%v needs Redis: without it every replica keeps its own SQLite database, so a client would see another replica's sessions and events as missing. Set redis.url (or redis.existingSecret), or replicaCount=1" .Values.replicaCount) }}
{{- end }}
{{- if and (not $redis) .Values.autoscaling.enabled }}
{{- fail "autoscaling.enabled needs Redis: without it every replica keeps its own SQLite database, so a client would see another replica's sessions and events as missing. Set redis.url (or redis.existingSecret), or turn autoscaling off" }}
{{- end }}
{{- if and .Values.redis.url .Values.redis.existingSecret }}
{{- fail "redis: set redis.url or redis.existingSecret, not both" }}
{{- end }}
{{- if and .Values.llm.apiKey .Values.llm.existingSecret }}
{{- fail "llm: set llm.apiKey or llm.existingSecret, not both" }}
{{- end }}
{{- if and .Values.auth.jwtSecret (lt (len .Values.auth.jwtSecret) 32) }}
{{- fail "auth.jwtSecret must be at least 32 bytes (HS256; e.g. openssl rand -base64 48)" }}
{{- end }}
{{- $keySources := list }}
{{- range $name := list "jwtSecret" "existingSecret" "publicKey" "publicKeyExistingSecret" "jwksUrl" }}
{{- if index $.Values.auth $name }}{{ $keySources = append $keySources (printf "auth.%s" $name) }}{{ end }}
{{- end }}
{{- if gt (len $keySources) 1 }}
{{- fail (printf "auth: set one JWT key source, not %s" (join " and " $keySources)) }}
{{- end }}
{{- if and (include "alex-server.scaledOut" .) .Values.auth.enabled (eq (len $keySources) 0) }}
{{- fail "auth: several replicas need one JWT key source (auth.jwtSecret, auth.existingSecret, auth.publicKey, auth.publicKeyExistingSecret or auth.jwksUrl); without one each replica would make its own secret and refuse the others' tokens" }}
{{- end }}
{{- if and .Values.persistence.enabled (include "alex-server.scaledOut" .) }}
{{- fail "persistence.enabled holds one data folder, and one folder serves one process only: with several replicas (Redis) leave persistence off, each pod gets an emptyDir for its workspaces" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if and (or .Values.serviceMonitor.enabled .Values.prometheusRule.enabled) (not (contains "alex-server" (include "alex-server.name" .))) }}
{{- fail (printf "nameOverride=%s: the ServiceMonitor names the scrape job after app.kubernetes.io/name, and the alert rules select job=~\".*alex-server.*\"; keep alex-server in the name" .Values.nameOverride) }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.containerPort)) }}
{{- fail "metrics.port must differ from containerPort" }}
{{- end }}
{{- $managed := dict
  "PORT" "containerPort"
  "ALEX_HOST" "(fixed: 0.0.0.0)"
  "ALEX_DATA_DIR" "persistence.mountPath"
  "ALEX_LOG_FORMAT" "(fixed: json)"
  "ALEX_SHUTDOWN_GRACE_SECONDS" "shutdown.graceSeconds"
  "ALEX_METRICS_ENABLED" "metrics.enabled"
  "ALEX_METRICS_PORT" "metrics.port"
  "ALEX_SANDBOX_BWRAP" "sandbox.bwrap"
  "ALEX_AUTH" "auth.enabled"
  "OPENAI_API_KEY" "llm.apiKey or llm.existingSecret"
  "ALEX_LLM_PROVIDER" "llm.provider"
  "ALEX_LLM_MODEL" "llm.model"
  "ALEX_BASE_URL" "llm.baseUrl"
  "ALEX_JWT_SECRET" "auth.jwtSecret or auth.existingSecret"
  "ALEX_JWT_PUBLIC_KEY" "auth.publicKey"
  "ALEX_JWT_PUBLIC_KEY_FILE" "auth.publicKeyExistingSecret"
  "ALEX_JWT_JWKS_URL" "auth.jwksUrl"
  "ALEX_JWT_ISSUER" "auth.issuer"
  "ALEX_JWT_AUDIENCE" "auth.audience"
  "ALEX_REDIS_URL" "redis.url or redis.existingSecret"
  "ALEX_REPLICA_ID" "(fixed: the pod's name)" }}
{{- range $name, $_ := .Values.config }}
{{- if hasKey $managed $name }}
{{- fail (printf "config.%s: the chart sets %s itself; use %s" $name $name (get $managed $name)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The container's environment: everything the server reads (docs/operations.md). */}}
{{- define "alex-server.env" -}}
- name: PORT
  value: {{ .Values.containerPort | quote }}
- name: ALEX_HOST
  value: "0.0.0.0"
- name: ALEX_DATA_DIR
  value: {{ .Values.persistence.mountPath | quote }}
- name: ALEX_LOG_FORMAT
  value: json
- name: ALEX_SHUTDOWN_GRACE_SECONDS
  value: {{ .Values.shutdown.graceSeconds | quote }}
- name: ALEX_METRICS_ENABLED
  value: {{ ternary "true" "false" .Values.metrics.enabled | quote }}
{{- if .Values.metrics.enabled }}
- name: ALEX_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
{{- end }}
- name: ALEX_SANDBOX_BWRAP
  value: {{ .Values.sandbox.bwrap | quote }}
{{- if not .Values.auth.enabled }}
- name: ALEX_AUTH
  value: disabled
{{- end }}
{{- with .Values.llm.provider }}
- name: ALEX_LLM_PROVIDER
  value: {{ . | quote }}
{{- end }}
{{- with .Values.llm.model }}
- name: ALEX_LLM_MODEL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.llm.baseUrl }}
- name: ALEX_BASE_URL
  value: {{ . | quote }}
{{- end }}
{{- if or .Values.llm.apiKey .Values.llm.existingSecret }}
- name: OPENAI_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ default (include "alex-server.fullname" .) .Values.llm.existingSecret }}
      key: {{ ternary .Values.llm.existingSecretKey "openai-api-key" (not (empty .Values.llm.existingSecret)) }}
{{- end }}
{{- if or .Values.auth.jwtSecret .Values.auth.existingSecret }}
- name: ALEX_JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ default (include "alex-server.fullname" .) .Values.auth.existingSecret }}
      key: {{ ternary .Values.auth.existingSecretKey "jwt-secret" (not (empty .Values.auth.existingSecret)) }}
{{- end }}
{{- with .Values.auth.publicKey }}
- name: ALEX_JWT_PUBLIC_KEY
  value: {{ . | quote }}
{{- end }}
{{- if .Values.auth.publicKeyExistingSecret }}
- name: ALEX_JWT_PUBLIC_KEY_FILE
  value: /etc/alex-server/jwt/{{ .Values.auth.publicKeyExistingSecretKey }}
{{- end }}
{{- with .Values.auth.jwksUrl }}
- name: ALEX_JWT_JWKS_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.auth.issuer }}
- name: ALEX_JWT_ISSUER
  value: {{ . | quote }}
{{- end }}
{{- with .Values.auth.audience }}
- name: ALEX_JWT_AUDIENCE
  value: {{ . | quote }}
{{- end }}
{{- if include "alex-server.redisEnabled" . }}
- name: ALEX_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "alex-server.fullname" .) .Values.redis.existingSecret }}
      key: {{ ternary .Values.redis.existingSecretKey "redis-url" (not (empty .Values.redis.existingSecret)) }}
- name: ALEX_REPLICA_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}
{{- range $name, $value := .Values.config }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
