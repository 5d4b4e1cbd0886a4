{{/* Names and labels. */}}
{{- define "bastion.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bastion.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "bastion.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bastion.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "bastion.labels" -}}
{{ include "bastion.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bastion
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* An image reference: by digest when one is given. */}}
{{- define "bastion.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{- define "bastion.configPath" -}}/etc/bastion/bastion.yaml{{- end -}}
{{- define "bastion.secretsDir" -}}/etc/bastion/secrets{{- end -}}
{{- define "bastion.chartSecretName" -}}{{ include "bastion.fullname" . }}-secrets{{- end -}}
{{- define "bastion.configMapName" -}}{{ include "bastion.fullname" . }}-platform{{- end -}}
{{- define "bastion.rayServiceName" -}}{{ include "bastion.fullname" . }}{{- end -}}
{{- define "bastion.gatewayPort" -}}{{ .Values.platform.gateway | default dict | dig "port" 8000 }}{{- end -}}

{{/*
The secrets the platform file needs, as a list of entries {name, file, env, generate, spec}:
`generate` says how the chart makes one when it is given neither a value nor an existing Secret
(token: 64 random characters; ed25519: a PKCS#8 PEM private key as `bastion audit keygen` writes;
aes256: 32 random bytes, base64, as the audit content cipher reads; empty: it must be given).
`file` is the name under /etc/bastion/secrets (bastion/serve/helm_values.py SECRET_FILES),
`env` the variable the loader reads (BASTION_DATABASE_URL, BASTION_REDIS_URL).
*/}}
{{- define "bastion.secretEntries" -}}
{{- $p := .Values.platform -}}
{{- $s := .Values.secrets -}}
{{- $entries := list (dict "name" "databaseUrl" "env" "BASTION_DATABASE_URL" "file" "" "generate" "" "spec" $s.databaseUrl) -}}
{{- if ($p.redis | default dict).url -}}
{{- $entries = append $entries (dict "name" "redisUrl" "env" "BASTION_REDIS_URL" "file" "" "generate" "" "spec" $s.redisUrl) -}}
{{- end -}}
{{- if ($p.auth | default dict).oidc_issuer -}}
{{- $entries = append $entries (dict "name" "oidcClientSecret" "env" "" "file" "oidc-client-secret" "generate" "" "spec" $s.oidcClientSecret) -}}
{{- end -}}
{{- $entries = append $entries (dict "name" "apiKeyPepper" "env" "" "file" "api-key-pepper" "generate" "token" "spec" $s.apiKeyPepper) -}}
{{- $entries = append $entries (dict "name" "auditSigningKey" "env" "" "file" "audit-signing-key" "generate" "ed25519" "spec" $s.auditSigningKey) -}}
{{- if ($p.audit | default dict).content_key_file -}}
{{- $entries = append $entries (dict "name" "auditContentKey" "env" "" "file" "audit-content-key" "generate" "aes256" "spec" $s.auditContentKey) -}}
{{- end -}}
{{- $entries = append $entries (dict "name" "poolStatsToken" "env" "" "file" "pool-stats-token" "generate" "token" "spec" $s.poolStatsToken) -}}
{{- toJson $entries -}}
{{- end -}}

{{/* The Secret name and key that hold one entry. */}}
{{- define "bastion.secretRef" -}}
{{- $e := .entry -}}
{{- if and $e.spec.existingSecret (not $e.spec.value) -}}
{{- toJson (dict "name" $e.spec.existingSecret "key" $e.spec.key) -}}
{{- else -}}
{{- toJson (dict "name" (include "bastion.chartSecretName" .root) "key" $e.spec.key) -}}
{{- end -}}
{{- end -}}

{{/* Environment from Secrets (the URLs the loader reads from BASTION_*). `only` limits to some entries. */}}
{{- define "bastion.secretEnv" -}}
{{- $root := .root -}}
{{- range $e := include "bastion.secretEntries" $root | fromJsonArray -}}
{{- if and $e.env (or (not $.only) (has $e.name $.only)) }}
{{- $ref := include "bastion.secretRef" (dict "root" $root "entry" $e) | fromJson }}
- name: {{ $e.env }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A projected volume with the key files under /etc/bastion/secrets. `only` limits to some entries. */}}
{{- define "bastion.secretVolume" -}}
{{- $root := .root -}}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
{{- range $e := include "bastion.secretEntries" $root | fromJsonArray -}}
{{- if and $e.file (or (not $.only) (has $e.name $.only)) }}
{{- $ref := include "bastion.secretRef" (dict "root" $root "entry" $e) | fromJson }}
      - secret:
          name: {{ $ref.name }}
          items:
            - key: {{ $ref.key }}
              path: {{ $e.file }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The restricted pod and container security contexts. */}}
{{- define "bastion.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "bastion.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The console's external URL: controlPlane.publicUrl, else https://<ingress host> with the Ingress, else none. */}}
{{- define "bastion.consoleUrl" -}}
{{- $cp := .Values.controlPlane -}}
{{- if $cp.publicUrl -}}
{{- $cp.publicUrl | trimSuffix "/" -}}
{{- else if $cp.ingress.enabled -}}
{{- printf "https://%s" $cp.ingress.host -}}
{{- end -}}
{{- end -}}

{{/* Where the control plane reads live replica statistics: the gateway Service KubeRay creates, unless set. */}}
{{- define "bastion.poolStatsUrl" -}}
{{- if .Values.controlPlane.poolStats.url -}}
{{- .Values.controlPlane.poolStats.url -}}
{{- else -}}
{{- printf "http://%s-serve-svc.%s.svc:%s/internal/pool/replicas" (include "bastion.rayServiceName" .) .Release.Namespace (include "bastion.gatewayPort" .) -}}
{{- end -}}
{{- end -}}

{{/* Checks that keep the generated values consistent (the platform file, serveConfig and workerGroups). */}}
{{- define "bastion.validate" -}}
{{- $p := required "values: `platform` is required (bastion helm values --config FILE)" .Values.platform -}}
{{- include "bastion.validateDigest" . -}}
{{- $classes := ($p.gpu_pool | default dict).classes | default dict -}}
{{- $groups := list -}}
{{- range $g := .Values.workerGroups -}}
{{- if not (hasKey $classes $g.gpuClass) -}}
{{- fail (printf "workerGroups: gpuClass %q is not a class of platform.gpu_pool.classes" $g.gpuClass) -}}
{{- end -}}
{{- if has $g.gpuClass $groups -}}
{{- fail (printf "workerGroups: gpuClass %q is listed twice" $g.gpuClass) -}}
{{- end -}}
{{- $groups = append $groups $g.gpuClass -}}
{{- if or (lt (int $g.minReplicas) 0) (gt (int $g.minReplicas) (int $g.replicas)) (lt (int $g.maxReplicas) (int $g.replicas)) -}}
{{- fail (printf "workerGroups[%s]: need minReplicas <= replicas <= maxReplicas" $g.gpuClass) -}}
{{- end -}}
{{- end -}}
{{- range $d := $p.deployments -}}
{{- if and $d.gpu_class (not (has $d.gpu_class $groups)) -}}
{{- fail (printf "platform.deployments: %s@%s runs on GPU class %q, which has no entry in workerGroups" $d.model $d.profile $d.gpu_class) -}}
{{- end -}}
{{- end -}}
{{- $apps := .Values.serveConfig.applications -}}
{{- if ne (len $apps) 1 -}}
{{- fail "serveConfig: expected one application (regenerate it with `bastion helm values`)" -}}
{{- end -}}
{{- if ne (len (index $apps 0).deployments) (len $p.deployments) -}}
{{- fail "serveConfig does not match platform.deployments: regenerate both with `bastion helm values`" -}}
{{- end -}}
{{- if ne (int .Values.serveConfig.http_options.port) (int (include "bastion.gatewayPort" .)) -}}
{{- fail "serveConfig.http_options.port differs from platform.gateway.port: regenerate with `bastion helm values`" -}}
{{- end -}}
{{- if ne (index $apps 0).args.config (include "bastion.configPath" .) -}}
{{- fail "serveConfig: the application must read /etc/bastion/bastion.yaml (regenerate with `bastion helm values`)" -}}
{{- end -}}
{{- $auth := $p.auth | default dict -}}
{{- if and $auth.oidc_issuer (not (or $auth.client_id .Values.controlPlane.oidc.clientId)) -}}
{{- fail "platform.auth.oidc_issuer is set but no OIDC client id: set auth.client_id in the platform file or controlPlane.oidc.clientId" -}}
{{- end -}}
{{- range $e := include "bastion.secretEntries" . | fromJsonArray -}}
{{- if and (not $e.generate) (not $e.spec.existingSecret) (not $e.spec.value) -}}
{{- fail (printf "secrets.%s: set existingSecret (and key) or value" $e.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* NetworkPolicy egress rules: DNS, and one external service (port and peers). */}}
{{- define "bastion.dnsEgress" -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ .Values.networkPolicy.dns.namespace }}
  ports:
    - {protocol: UDP, port: {{ .Values.networkPolicy.dns.port }}}
    - {protocol: TCP, port: {{ .Values.networkPolicy.dns.port }}}
{{- end -}}
{{- define "bastion.peerEgress" -}}
- ports:
    - {protocol: TCP, port: {{ .port }}}
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
Checkov suppressions, each with its reason (docs/operations.md, "Security scan: justified skips").
Arguments: image (the images.* entry), rayPod (true for Ray pods, whose probes KubeRay injects).
*/}}
{{- define "bastion.checkovSkips" -}}
checkov.io/skip1: CKV_K8S_35=BASTION_DATABASE_URL and BASTION_REDIS_URL are read from the environment by the platform loader; key files are mounted as files
{{- if not .image.digest }}
checkov.io/skip2: CKV_K8S_43=the image digest is known only once the site builds or mirrors the image; set images.*.digest to pull by digest
{{- end }}
{{- if .rayPod }}
checkov.io/skip3: CKV_K8S_8=KubeRay injects the liveness probe of Ray containers (raylet, GCS and Serve proxy health)
checkov.io/skip4: CKV_K8S_9=KubeRay injects the readiness probe of Ray containers (raylet, GCS and Serve proxy health)
{{- end }}
{{- end -}}

{{/* The rendered platform file and Serve config must be exactly the pair `bastion helm values` generated. */}}
{{- define "bastion.validateDigest" -}}
{{- $digest := toJson (dict "platform" .Values.platform "serveConfig" .Values.serveConfig) | sha256sum -}}
{{- if ne $digest .Values.generatedSha256 -}}
{{- fail "platform/serveConfig are not the pair `bastion helm values` generated (edited by hand or --set, or deep-merged with the chart's default platform): regenerate the values with `bastion helm values --config FILE --chart helm/bastion --out FILE`" -}}
{{- end -}}
{{- end -}}
