{{/* Names and labels. */}}
{{- define "moefleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; also the RayCluster's name. KubeRay appends "-head-svc" and pod
suffixes to it, so it is kept to 40 characters. */}}
{{- define "moefleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moefleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moefleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moefleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "moefleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "moefleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moefleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "moefleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "moefleet.redisHost" -}}
{{- printf "%s-redis" (include "moefleet.fullname" .) }}
{{- end }}

{{/* Checks of values that the schema cannot express. */}}
{{- define "moefleet.checks" -}}
{{- if and .Values.autoscaling.enabled .Values.rayAutoscaler.enabled }}
{{- fail "autoscaling.enabled and rayAutoscaler.enabled: pick one, both would set the worker groups' replicas" }}
{{- end }}
{{- if and (eq .Values.redis.mode "external") (not .Values.redis.url) }}
{{- fail "redis.mode external needs redis.url (redis://host:port/db)" }}
{{- end }}
{{- if and .Values.redis.passwordSecret.name (not .Values.redis.passwordSecret.key) }}
{{- fail "redis.passwordSecret.name is set: give redis.passwordSecret.key too" }}
{{- end }}
{{- range $kind := list "adminTokens" "inferenceTokens" }}
{{- $ref := get $.Values.auth $kind }}
{{- if and $ref.name (not $ref.key) }}
{{- fail (printf "auth.%s.name is set: give auth.%s.key too" $kind $kind) }}
{{- end }}
{{- end }}
{{- range $group := list "replicas" "shards" }}
{{- $spec := get $.Values.workerGroups $group }}
{{- if not (and (le (int $spec.minReplicas) (int $spec.replicas)) (le (int $spec.replicas) (int $spec.maxReplicas))) }}
{{- fail (printf "workerGroups.%s.replicas (%d) must lie between minReplicas (%d) and maxReplicas (%d)" $group (int $spec.replicas) (int $spec.minReplicas) (int $spec.maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* cluster.yaml: the user's `config` with the keys the chart owns set on top. */}}
{{- define "moefleet.clusterConfig" -}}
{{- $config := deepCopy .Values.config }}
{{- $engine := deepCopy (default dict $config.engine) }}
{{- $_ := set $engine "shard_resources" (list (dict "moefleet_shard_slot" 1)) }}
{{- $_ := set $config "engine" $engine }}
{{- $_ := set $config "host" "0.0.0.0" }}
{{- $_ := set $config "grpc_port" 50051 }}
{{- $_ := set $config "http_port" 8000 }}
{{- $_ := set $config "ray_address" "auto" }}
{{- $_ := set $config "replica_resources" (list (dict "moefleet_replica_slot" 1)) }}
{{- if eq .Values.redis.mode "bundled" }}
{{- $_ := set $config "state_store" (printf "redis://%s:6379/0" (include "moefleet.redisHost" .)) }}
{{- else if eq .Values.redis.mode "external" }}
{{- $_ := set $config "state_store" .Values.redis.url }}
{{- end }}
{{- if .Values.auth.adminTokens.name }}
{{- $_ := set $config "admin_token_file" "/etc/moefleet/secrets/admin/tokens" }}
{{- end }}
{{- if .Values.auth.inferenceTokens.name }}
{{- $_ := set $config "inference_token_file" "/etc/moefleet/secrets/inference/tokens" }}
{{- end }}
{{- if .Values.tls.secretName }}
{{- $_ := set $config "tls_cert" "/etc/moefleet/tls/tls.crt" }}
{{- $_ := set $config "tls_key" "/etc/moefleet/tls/tls.key" }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- $_ := set $config "autoscaling_policy" "/etc/moefleet/policy.yaml" }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* What every Ray pod shares: labels, security, volumes. Called with (list $ "component"). */}}
{{- define "moefleet.podMetadata" -}}
{{- $ := index . 0 -}}
metadata:
  labels:
    {{- include "moefleet.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ index . 1 }}
  {{- with $.Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{- define "moefleet.rayVolumes" -}}
# /tmp and Ray's session directory are the only writable paths (the root filesystem is read-only);
# KubeRay mounts a volume named ray-logs into its autoscaler sidecar too.
- name: tmp
  emptyDir: {}
- name: ray-logs
  emptyDir: {}
{{- with .Values.volumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "moefleet.rayVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: ray-logs
  mountPath: /tmp/ray
{{- with .Values.volumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "moefleet.rayEnv" -}}
# HOME on the writable /tmp: caches (the CPU kernels' build, a generated model) go there.
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The Ray resource a worker group's nodes offer, as rayStartParams' `resources` (KubeRay puts it
into the `ray start` command line as it is, hence the shell quotes). */}}
{{- define "moefleet.rayResources" -}}
{{- printf "'{\"%s\":%d}'" (index . 0) (int (index . 1)) }}
{{- end }}

{{/* One worker group; the replica and the shard group both come from here.
Called with (list $ "replicas" "moefleet_replica_slot"). */}}
{{- define "moefleet.workerGroup" -}}
{{- $ := index . 0 }}
{{- $name := index . 1 }}
{{- $group := get $.Values.workerGroups $name -}}
- groupName: {{ $name }}
  replicas: {{ $group.replicas }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  rayStartParams:
    resources: {{ include "moefleet.rayResources" (list (index . 2) $group.slots) | quote }}
    {{- range $key, $value := $group.rayStartParams }}
    {{ $key }}: {{ $value | quote }}
    {{- end }}
  template:
    {{- include "moefleet.podMetadata" (list $ $name) | nindent 4 }}
    spec:
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ include "moefleet.gracePeriod" $ }}
      {{- with $.Values.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "moefleet.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          # The RayCluster overwrites KubeRay's container command (ray.io/overwrite-container-cmd):
          # eval, so the quotes in the generated command's --resources are read as quotes.
          command: ["/bin/bash", "-c", "--"]
          args: ["ulimit -n 65536 || true; eval \"exec $KUBERAY_GEN_RAY_START_CMD\""]
          resources:
            {{- include "moefleet.groupResources" (list $ $group) | nindent 12 }}
          env:
            {{- include "moefleet.rayEnv" $ | nindent 12 }}
          {{- with $.Values.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            {{- include "moefleet.rayVolumeMounts" $ | nindent 12 }}
      volumes:
        {{- include "moefleet.rayVolumes" $ | nindent 8 }}
{{- end }}

{{/* A group's resources with its GPUs added to requests and limits. */}}
{{- define "moefleet.groupResources" -}}
{{- $ := index . 0 }}
{{- $group := index . 1 }}
{{- $resources := deepCopy $group.resources }}
{{- if gt (int $group.gpus) 0 }}
{{- $requests := default dict $resources.requests }}
{{- $limits := default dict $resources.limits }}
{{- $_ := set $requests $.Values.gpuResourceName (int $group.gpus) }}
{{- $_ := set $limits $.Values.gpuResourceName (int $group.gpus) }}
{{- $_ := set $resources "requests" $requests }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* Pods get the drain grace of cluster.yaml and 15 s to stop Ray. */}}
{{- define "moefleet.gracePeriod" -}}
{{- $grace := 30 }}
{{- if hasKey .Values.config "drain_grace_s" }}
{{- $grace = .Values.config.drain_grace_s }}
{{- end }}
{{- add 15 (int (ceil $grace)) }}
{{- end }}

{{/* The policy API of PodDisruptionBudgets the cluster serves: helm install (and helm template
--api-versions) list kinds; offline Helm knows none, and then no budget is rendered rather than one
of an API the cluster may not serve (policy/v1 from 1.21, policy/v1beta1 up to 1.24). */}}
{{- define "moefleet.pdbApiVersion" -}}
{{- if .Values.podDisruptionBudget.apiVersion }}
{{- .Values.podDisruptionBudget.apiVersion }}
{{- else if .Capabilities.APIVersions.Has "policy/v1/PodDisruptionBudget" }}
{{- print "policy/v1" }}
{{- else if .Capabilities.APIVersions.Has "policy/v1beta1/PodDisruptionBudget" }}
{{- print "policy/v1beta1" }}
{{- end }}
{{- end }}
