{{- define "ringmq-operator.name" -}}
{{- default .Chart.Name .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ringmq-operator.labels" -}}
app.kubernetes.io/name: ringmq-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ringmq-operator.selector" -}}
app.kubernetes.io/name: ringmq-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ringmq-operator.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ringmq-operator.name" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The rules the operator needs, and nothing more. */}}
{{- define "ringmq-operator.rules" -}}
- apiGroups: ["ringmq.io"]
  resources: ["mqttinstances"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["ringmq.io"]
  resources: ["mqttinstances/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["ringmq.io"]
  resources: ["mqttinstances/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch"]
# Pods: read to follow a drain; deleted only to recreate one stuck on a
# broken revision after a fix, or a drained one whose scale-down was called off.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "delete"]
# The pods' data volumes: read and grown when the data size grows (a
# StatefulSet's claim templates cannot change).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors", "prometheusrules"]
  verbs: ["get", "create", "patch"]
{{- end -}}
