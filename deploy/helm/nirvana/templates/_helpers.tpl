{{/* Release-qualified name, at most 63 characters (a DNS label). */}}
{{- define "nirvana.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "nirvana.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "nirvana.labels" -}}
{{ include "nirvana.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "nirvana.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "nirvana.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "nirvana.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/*
Milvus URI of the cache index: the external one, else the dependency chart's service (named as the Milvus chart
names it: <release>-milvus, or fullnameOverride), else empty (milvus-lite, one replica; the schema enforces it).
*/}}
{{- define "nirvana.milvusUri" -}}
{{- if .Values.externalMilvus.uri -}}
{{- .Values.externalMilvus.uri -}}
{{- else if .Values.milvus.enabled -}}
{{- $name := .Values.milvus.fullnameOverride | default (ternary .Release.Name (printf "%s-milvus" .Release.Name) (contains "milvus" .Release.Name)) -}}
{{- printf "http://%s:19530" ($name | trunc 63 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}

{{/* "true" when old and new pods can run side by side: a Milvus server and no ReadWriteOnce volume. */}}
{{- define "nirvana.sharedVolumes" -}}
{{- $models := .Values.modelRepository.persistence -}}
{{- if and (include "nirvana.milvusUri" .) (eq .Values.latentStore.accessMode "ReadWriteMany") (or (not $models.enabled) (eq $models.accessMode "ReadWriteMany")) -}}
true
{{- end -}}
{{- end -}}

{{- define "nirvana.latentClaim" -}}
{{- .Values.latentStore.existingClaim | default (printf "%s-latents" (include "nirvana.fullname" .)) -}}
{{- end -}}

{{- define "nirvana.modelClaim" -}}
{{- .Values.modelRepository.persistence.existingClaim | default (printf "%s-models" (include "nirvana.fullname" .)) -}}
{{- end -}}

{{/* Where the credentials are mounted (fixed: the engine config and the entrypoint point at them). */}}
{{- define "nirvana.adminKeyFile" -}}/var/run/secrets/nirvana/admin/key{{- end -}}
{{- define "nirvana.internalSecretFile" -}}/var/run/secrets/nirvana/internal/secret{{- end -}}
{{- define "nirvana.milvusTokenFile" -}}/var/run/secrets/nirvana/milvus/token{{- end -}}

{{/* Secrets: the one the operator named, else the one the chart creates (templates/secret.yaml). */}}
{{- define "nirvana.adminKeySecret" -}}
{{- .Values.security.adminKey.existingSecret | default (printf "%s-admin-key" (include "nirvana.fullname" .)) -}}
{{- end -}}
{{- define "nirvana.internalSecret" -}}
{{- .Values.security.internalSecret.existingSecret | default (printf "%s-internal" (include "nirvana.fullname" .)) -}}
{{- end -}}

{{/* The tenant header the gateway sets: the engine config's security.tenant_header. */}}
{{- define "nirvana.tenantHeader" -}}
{{- (.Values.engineConfig.security | default dict).tenant_header | default "x-nirvana-tenant" -}}
{{- end -}}

{{/*
The engine config: engineConfig with the paths the chart owns set (the credentials' mount points).
*/}}
{{- define "nirvana.engineConfig" -}}
{{- $config := deepCopy .Values.engineConfig -}}
{{- $security := deepCopy ($config.security | default dict) -}}
{{- $_ := set $security "internal_secret_file" (include "nirvana.internalSecretFile" .) -}}
{{- $_ := set $config "security" $security -}}
{{- if .Values.security.milvusToken.existingSecret -}}
{{- $cache := deepCopy ($config.cache | default dict) -}}
{{- $_ := set $cache "milvus_token_file" (include "nirvana.milvusTokenFile" .) -}}
{{- $_ := set $config "cache" $cache -}}
{{- end -}}
{{- toPrettyJson $config -}}
{{- end -}}

{{/* Environment shared by the engine-building init container and the server. */}}
{{- define "nirvana.env" -}}
- name: NIRVANA_CHECKPOINT
  value: /models/checkpoint
- name: NIRVANA_MODEL_REPOSITORY
  value: /models/repository
- name: NIRVANA_CACHE_DIR
  value: /var/cache/nirvana
- name: NIRVANA_PROFILE
  value: gpu
- name: NIRVANA_MILVUS_URI
  value: {{ include "nirvana.milvusUri" . | quote }}
- name: NIRVANA_CONFIG
  value: /etc/nirvana/config.json
- name: NIRVANA_HTTP_PORT
  value: {{ .Values.service.httpPort | quote }}
- name: NIRVANA_GRPC_PORT
  value: {{ .Values.service.grpcPort | quote }}
- name: NIRVANA_METRICS_PORT
  value: {{ .Values.service.metricsPort | quote }}
- name: NIRVANA_TENANT_HEADER
  value: {{ include "nirvana.tenantHeader" . | quote }}
- name: HOME
  value: /tmp
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Mounts shared by the engine-building init container and the server: (dict "root" $ "serving" bool). The server
mounts the model repository read-only (its model.py files are code Triton runs); only the builder writes it.
*/}}
{{- define "nirvana.volumeMounts" -}}
{{- $serving := .serving -}}
{{- with .root -}}
- name: checkpoint
  mountPath: /models/checkpoint
  readOnly: true
  {{- if and (eq .Values.checkpoint.source "pvc") .Values.checkpoint.pvc.subPath }}
  subPath: {{ .Values.checkpoint.pvc.subPath }}
  {{- end }}
- name: model-repository
  mountPath: /models/repository
  {{- if $serving }}
  readOnly: true
  {{- end }}
- name: latents
  mountPath: /var/cache/nirvana
- name: config
  mountPath: /etc/nirvana
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
- name: internal-secret
  mountPath: {{ include "nirvana.internalSecretFile" . | dir }}
  readOnly: true
{{- if .Values.security.milvusToken.existingSecret }}
- name: milvus-token
  mountPath: {{ include "nirvana.milvusTokenFile" . | dir }}
  readOnly: true
{{- end }}
{{- if $serving }}
- name: admin-key
  mountPath: {{ include "nirvana.adminKeyFile" . | dir }}
  readOnly: true
{{- end }}
{{- end -}}
{{- end -}}
