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
- name: HOME
  value: /tmp
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Mounts shared by the engine-building init container and the server. */}}
{{- define "nirvana.volumeMounts" -}}
- name: checkpoint
  mountPath: /models/checkpoint
  readOnly: true
  {{- if and (eq .Values.checkpoint.source "pvc") .Values.checkpoint.pvc.subPath }}
  subPath: {{ .Values.checkpoint.pvc.subPath }}
  {{- end }}
- name: model-repository
  mountPath: /models/repository
- name: latents
  mountPath: /var/cache/nirvana
- name: config
  mountPath: /etc/nirvana
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- end -}}
