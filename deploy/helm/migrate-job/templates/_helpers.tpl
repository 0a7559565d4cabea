{{/* Names */}}
{{- define "migrate-job.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "migrate-job.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "migrate-job.labels" -}}
app.kubernetes.io/name: {{ include "migrate-job.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "migrate-job.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "migrate-job.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "migrate-job.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret holding DATABASE_URL, and its key */}}
{{- define "migrate-job.secretName" -}}
{{- default (printf "%s-database" (include "migrate-job.fullname" .)) .Values.database.existingSecret -}}
{{- end -}}

{{- define "migrate-job.secretKey" -}}
{{- if .Values.database.existingSecret -}}{{ .Values.database.existingSecretKey }}{{- else -}}DATABASE_URL{{- end -}}
{{- end -}}

{{/* Are backups on, and in a bucket or on which claim */}}
{{- define "migrate-job.backupsOn" -}}
{{- if ne .Values.backups.mode "off" -}}true{{- end -}}
{{- end -}}

{{- define "migrate-job.backupsInBucket" -}}
{{- if and (include "migrate-job.backupsOn" .) .Values.backups.s3.bucket -}}true{{- end -}}
{{- end -}}

{{- define "migrate-job.backupsOnClaim" -}}
{{- if and (include "migrate-job.backupsOn" .) (not .Values.backups.s3.bucket) -}}true{{- end -}}
{{- end -}}

{{- define "migrate-job.claimName" -}}
{{- default (printf "%s-backups" (include "migrate-job.fullname" .)) .Values.backups.persistence.existingClaim -}}
{{- end -}}

{{/* Values that the schema alone cannot check */}}
{{- define "migrate-job.validate" -}}
{{- with .Values.database.auth -}}
{{- $sources := 0 -}}
{{- if .passwordSecret.name }}{{ $sources = add1 $sources }}{{ end -}}
{{- if .passwordCommand }}{{ $sources = add1 $sources }}{{ end -}}
{{- if ne .provider "password" }}{{ $sources = add1 $sources }}{{ end -}}
{{- if gt $sources 1 -}}
{{- fail "database.auth: set one of passwordSecret.name, passwordCommand and a provider other than password: two would both give the password" -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.database.existingSecret) (not .Values.database.url) -}}
{{- fail "database: set database.existingSecret (a Secret holding DATABASE_URL; recommended) or database.url" -}}
{{- end -}}
{{- if and (include "migrate-job.backupsOnClaim" .) (not .Values.backups.persistence.existingClaim) (not .Values.backups.persistence.create) -}}
{{- fail "backups: they need a bucket (backups.s3.bucket) or a PersistentVolumeClaim (backups.persistence.existingClaim, or backups.persistence.create: true); an emptyDir would lose them with the pod. Or set backups.mode: off" -}}
{{- end -}}
{{- if and (eq .Values.migration.mode "initContainer") (include "migrate-job.backupsOnClaim" .) (not .Values.backups.persistence.existingClaim) (gt (int .Values.app.replicas) 1) (not (has "ReadWriteMany" .Values.backups.persistence.accessModes)) -}}
{{- fail "backups: in initContainer mode every app pod mounts the backup claim; with more than one replica it must be ReadWriteMany (backups.persistence.accessModes), an existingClaim that is; or keep backups in a bucket (backups.s3.bucket), or set backups.mode: off" -}}
{{- end -}}
{{- with .Values.migration.fleet -}}
{{- if and (gt (int .shards) 1) (or (ne $.Values.migration.mode "hook") (not .targets)) -}}
{{- fail "migration.fleet.shards: an Indexed Job shares a fleet among its pods: it needs migration.mode: hook and migration.fleet.targets" -}}
{{- end -}}
{{- if and (gt (int .shards) 1) (include "migrate-job.backupsOnClaim" $) (not $.Values.backups.persistence.existingClaim) (not (has "ReadWriteMany" $.Values.backups.persistence.accessModes)) -}}
{{- fail "backups: the fleet's shards run at once, each mounting the backup claim: it must be ReadWriteMany (backups.persistence.accessModes), an existingClaim that is; or keep backups in a bucket (backups.s3.bucket), or set backups.mode: off" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Pod-level settings every pod of the chart shares */}}
{{- define "migrate-job.podSpecCommon" -}}
serviceAccountName: {{ include "migrate-job.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
securityContext:
  {{- toYaml .Values.securityContext.pod | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The job's environment; `withBackups` adds the backup settings */}}
{{- define "migrate-job.env" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "migrate-job.secretName" .root }}
      key: {{ include "migrate-job.secretKey" .root }}
- name: MIGRATE_TARGET
  value: {{ .root.Values.migration.target | quote }}
- name: MIGRATE_WAIT_TIMEOUT
  value: {{ .waitTimeout | quote }}
- name: MIGRATE_LOCK_TIMEOUT
  value: {{ .root.Values.migration.lockTimeout | quote }}
- name: MIGRATE_STATEMENT_LOCK_TIMEOUT
  value: {{ .root.Values.migration.statementLockTimeout | quote }}
- name: MIGRATE_LOCK_RETRIES
  value: {{ .root.Values.migration.lockRetries | quote }}
- name: MIGRATE_ALLOW_AHEAD
  value: {{ .root.Values.migration.allowAhead | quote }}
- name: MIGRATE_LOG_FORMAT
  value: {{ .root.Values.migration.logFormat | quote }}
- name: MIGRATE_LOG_LEVEL
  value: {{ .root.Values.migration.logLevel | quote }}
{{- with .root.Values.migration.fleet }}
{{- if .targets }}
# (the migration runs over the fleet; the app's wait-for-migrations waits for all of it)
- name: MIGRATE_FLEET
  value: {{ .targets | quote }}
- name: MIGRATE_FLEET_PARALLEL
  value: {{ .parallel | quote }}
- name: MIGRATE_FLEET_CANARY
  value: {{ .canary | quote }}
- name: MIGRATE_FLEET_FAIL_FAST
  value: {{ .failFast | quote }}
- name: MIGRATE_TENANT_SCHEMA_VIA
  value: {{ .schemaVia | quote }}
{{- if and $.withBackups (gt (int .shards) 1) }}
- name: MIGRATE_FLEET_SHARDS
  value: {{ .shards | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if .withBackups }}
- name: MIGRATE_BACKUP
  value: {{ .root.Values.backups.mode | quote }}
{{- end }}
{{- if and .withBackups (include "migrate-job.backupsOnClaim" .root) }}
- name: MIGRATE_BACKUP_DIR
  value: /backups
{{- end }}
{{- if and .withBackups (include "migrate-job.backupsInBucket" .root) }}
{{- with .root.Values.backups.s3 }}
- name: MIGRATE_BACKUP_DIR
  value: {{ printf "s3://%s/%s" .bucket (trimAll "/" .prefix) | quote }}
- name: MIGRATE_S3_ADDRESSING
  value: {{ .addressing | quote }}
{{- with .endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- if .credentials.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .credentials.existingSecret }}
      key: {{ .credentials.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .credentials.existingSecret }}
      key: {{ .credentials.secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end }}
{{- with .root.Values.database.auth }}
{{- if ne .provider "password" }}
- name: MIGRATE_AUTH
  value: {{ .provider | quote }}
{{- end }}
{{- if .passwordSecret.name }}
- name: DATABASE_PASSWORD_FILE
  value: /etc/migrate-job/database/password
{{- end }}
{{- with .passwordCommand }}
- name: MIGRATE_PASSWORD_COMMAND
  value: {{ . | quote }}
- name: MIGRATE_PASSWORD_CACHE
  value: {{ $.root.Values.database.auth.passwordCache | quote }}
{{- end }}
{{- end }}
{{- if .root.Values.database.tls.caConfigMap }}
- name: PGSSLROOTCERT
  value: /etc/migrate-job/ca/ca.crt
{{- end }}
{{- if and .withBackups (include "migrate-job.backupsOn" .root) }}
- name: MIGRATE_BACKUP_KEEP
  value: {{ .root.Values.backups.keep | quote }}
{{- end }}
{{- with .root.Values.migration.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A migrate-job container: name, args, wait timeout, whether it mounts the backups, and env (more variables) */}}
{{- define "migrate-job.container" -}}
- name: {{ .name }}
  image: {{ include "migrate-job.image" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  args:
    {{- toYaml .args | nindent 4 }}
  env:
    {{- include "migrate-job.env" . | nindent 4 }}
  securityContext:
    {{- toYaml .root.Values.securityContext.container | nindent 4 }}
  resources:
    {{- toYaml .root.Values.migration.resources | nindent 4 }}
  terminationMessagePath: /dev/termination-log
  terminationMessagePolicy: FallbackToLogsOnError
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- if and .withBackups (include "migrate-job.backupsOnClaim" .root) }}
    - name: backups
      mountPath: /backups
    {{- end }}
    {{- if .root.Values.database.auth.passwordSecret.name }}
    # (a directory, not a subPath: Kubernetes updates it when the Secret rotates)
    - name: database-password
      mountPath: /etc/migrate-job/database
      readOnly: true
    {{- end }}
    {{- if .root.Values.database.tls.caConfigMap }}
    - name: database-ca
      mountPath: /etc/migrate-job/ca
      readOnly: true
    {{- end }}
{{- end -}}

{{- define "migrate-job.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if and .withBackups (include "migrate-job.backupsOnClaim" .root) }}
- name: backups
  persistentVolumeClaim:
    claimName: {{ include "migrate-job.claimName" .root }}
{{- end }}
{{- with .root.Values.database.auth.passwordSecret }}
{{- if .name }}
- name: database-password
  secret:
    secretName: {{ .name }}
    items:
      - key: {{ .key }}
        path: password
{{- end }}
{{- end }}
{{- with .root.Values.database.tls }}
{{- if .caConfigMap }}
- name: database-ca
  configMap:
    name: {{ .caConfigMap }}
    items:
      - key: {{ .caKey }}
        path: ca.crt
{{- end }}
{{- end }}
{{- end -}}

{{/* Where a pod may run, and what it carries: the component's own values (migration.* or app.*),
     else the global ones, as the Airflow chart does. Call with (dict "root" . "component" .Values.app). */}}
{{- define "migrate-job.scheduling" -}}
{{- $root := .root.Values -}}
{{- with (default $root.nodeSelector .component.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.affinity .component.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.tolerations .component.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.priorityClassName .component.priorityClassName) }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* The pod template's annotations: the global ones, overridden by the component's */}}
{{- define "migrate-job.podAnnotations" -}}
{{- with (merge (deepCopy .component.podAnnotations) (deepCopy .root.Values.podAnnotations)) }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The pod template's extra labels: the global ones, overridden by the component's; Azure's
     workload identity webhook injects the pod's token only into pods labelled for it */}}
{{- define "migrate-job.podLabels" -}}
{{- $identity := dict -}}
{{- if eq .root.Values.database.auth.provider "azure-entra" -}}
{{- $identity = dict "azure.workload.identity/use" "true" -}}
{{- end -}}
{{- with (merge (deepCopy .component.podLabels) (deepCopy .root.Values.podLabels) $identity) }}
{{- toYaml . }}
{{- end }}
{{- end -}}
