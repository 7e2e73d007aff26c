{{/* The release's base name, at most 40 characters: "-<region>" and "-metrics" follow. */}}
{{- define "reconciler.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "reconciler.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "reconciler.labels" -}}
{{ include "reconciler.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "reconciler.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "reconciler.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Where the pod finds its files; the config names secrets by these paths. */}}
{{- define "reconciler.configDir" -}}/etc/reconciler/config{{- end -}}
{{- define "reconciler.secretDir" -}}/etc/reconciler/secrets{{- end -}}

{{/* Refuse values that would render a broken or unsafe release, naming the value. */}}
{{- define "reconciler.validate" -}}
{{- if lt (len .Values.regions) 2 -}}
{{- fail "regions: at least two regions are required" -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $region := .Values.regions -}}
{{- if not (regexMatch "^[a-z0-9][a-z0-9-]{0,30}$" (toString $region.name)) -}}
{{- fail (printf "regions[%d].name: %q is not a region id (lower-case letters, digits and dashes)" $i (toString $region.name)) -}}
{{- end -}}
{{- if hasKey $seen $region.name -}}
{{- fail (printf "regions[%d].name: %s appears twice" $i $region.name) -}}
{{- end -}}
{{- $_ := set $seen $region.name true -}}
{{- if not (and $region.dsnSecret $region.dsnSecret.name $region.dsnSecret.key) -}}
{{- fail (printf "regions[%d].dsnSecret: name and key of the Secret holding %s's DSN are required" $i $region.name) -}}
{{- end -}}
{{- end -}}
{{- range $key := list "regions" "kafka" -}}
{{- if hasKey $.Values.config $key -}}
{{- fail (printf "config.%s: set .Values.%s instead; the chart writes this part of the config" $key $key) -}}
{{- end -}}
{{- end -}}
{{- range $prop, $ref := .Values.kafka.properties -}}
{{- if has $prop (list "sasl.password" "ssl.key.password" "ssl.keystore.password" "sasl.oauthbearer.client.secret") -}}
{{- fail (printf "kafka.properties.%s: a secret; reference a Secret under kafka.secretProperties instead" $prop) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The config file of one region's pod: .root is the chart context, .region one entry of regions. */}}
{{- define "reconciler.config" -}}
{{- $root := .root -}}
{{- $self := .region -}}
{{- $secretDir := include "reconciler.secretDir" $root -}}
{{- $config := deepCopy $root.Values.config -}}
{{- $kafka := deepCopy ($root.Values.kafka.properties | default dict) -}}
{{- range $prop, $ref := $root.Values.kafka.secretProperties -}}
{{- $_ := set $kafka $prop (printf "file:%s/kafka/%s" $secretDir $prop) -}}
{{- end -}}
{{- $_ := set $config "kafka" $kafka -}}
{{- $regions := dict -}}
{{- range $root.Values.regions -}}
{{- $entry := dict "dsn" (printf "file:%s/dsn/%s" $secretDir .name) "metrics_address" "${RECONCILER_METRICS_ADDRESS}" -}}
{{- if eq .name $self.name -}}
{{- $own := deepCopy ((.kafka | default dict).properties | default dict) -}}
{{- range $prop, $ref := ((.kafka | default dict).secretProperties | default dict) -}}
{{- $_ := set $own $prop (printf "file:%s/region-kafka/%s" $secretDir $prop) -}}
{{- end -}}
{{- if $own -}}
{{- $_ := set $entry "kafka" $own -}}
{{- end -}}
{{- end -}}
{{- $_ := set $regions .name $entry -}}
{{- end -}}
{{- $_ := set $config "regions" $regions -}}
{{- toYaml $config -}}
{{- end -}}
