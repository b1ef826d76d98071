{{- define "acceld.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "acceld.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "acceld.agentSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "acceld.webhookSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{- /* Where the ConfigMap of registryHosts.files is mounted. */ -}}
{{- define "acceld.hostsFilesDir" -}}/etc/acceld/certs.d{{- end -}}

{{- /* The agent's hosts_dir: the ConfigMap's files first, then the node's. */ -}}
{{- define "acceld.agentHostsDir" -}}
{{- $roots := list -}}
{{- if .Values.registryHosts.files -}}{{- $roots = append $roots (include "acceld.hostsFilesDir" .) -}}{{- end -}}
{{- if .Values.registryHosts.nodePath -}}{{- $roots = append $roots .Values.registryHosts.nodePath -}}{{- end -}}
{{- join ":" $roots -}}
{{- end -}}

{{- /* The volume of registryHosts.files: each text as <registry>/hosts.toml. */ -}}
{{- define "acceld.hostsFilesVolume" -}}
- name: registry-hosts-files
  configMap:
    name: {{ include "acceld.fullname" . }}-registry-hosts
    items:
      {{- range $name, $_ := .Values.registryHosts.files }}
      - key: {{ $name }}
        path: {{ $name }}/hosts.toml
      {{- end }}
{{- end -}}

{{- /* HTTP_PROXY / HTTPS_PROXY / NO_PROXY from proxy.*, each only when set: upper-case,
the names containerd reads, so registry traffic goes the way the node's does. */ -}}
{{- define "acceld.proxyEnv" -}}
{{- range $name, $key := dict "HTTP_PROXY" "httpProxy" "HTTPS_PROXY" "httpsProxy" "NO_PROXY" "noProxy" }}
{{- with index $.Values.proxy $key }}
- name: {{ $name }}
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "acceld.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "acceld.webhookService" -}}
{{ include "acceld.fullname" . }}-webhook
{{- end -}}
