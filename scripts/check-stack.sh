#!/usr/bin/env bash
# Check the Serverless stack without an AWS account:
#
#   1. package it offline with `serverless package`, and check the unzipped size of the
#      deployment package against Lambda's 250 MB limit;
#   2. lint the generated CloudFormation template with cfn-lint and checkov;
#   3. rehearse a deploy: `serverless deploy` into a moto server on 127.0.0.1, check the
#      created queues, table, functions, roles, event source mappings and EFS resources
#      with scripts/verify_deployment.py, then delete the mappings and stop the server.
#
# Usage: scripts/check-stack.sh [STAGE]        (STAGE defaults to dev)
#
# Needs node and npm (node_modules is installed with `npm ci` when missing) and python3.
# cfn-lint and moto come from .venv when it exists (`make test` creates it); otherwise,
# like checkov, they are installed into a tools venv under ~/.cache/baton-check-stack.
# The AWS variables are set to dummy values below, and the only endpoint contacted is the
# moto server this script starts.
# Exits non-zero on a packaging failure, a package over 250 MB, any cfn-lint or checkov
# finding that is not suppressed below, or a failed deployment check.
set -euo pipefail

stage="${1:-dev}"
# The checks package and deploy with a models bucket, so that the template they lint and
# the stack they verify contain one. The default, an empty params.modelsBucket, creates none.
models_bucket="baton-${stage}-models-rehearsal"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
script_started=$SECONDS

# Dummy credentials and no instance metadata lookups, so nothing reaches a real account.
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
export SLS_TELEMETRY_DISABLED=1

# Lambda's limit for a function's code and layers, unzipped: 250 MB.
max_unzipped_bytes=262144000
checkov_version=3.3.30
tools_venv="${BATON_TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/baton-check-stack/venv}"

# Package into a private folder, so a concurrent `serverless` run in this checkout
# cannot replace the files checked here.
package_dir="$(mktemp -d "${TMPDIR:-/tmp}/baton-check-stack.XXXXXX")"
template="$package_dir/cloudformation-template-update-stack.json"
moto_pid=""

cleanup() {
  # Stop only the moto server this script started, by its process id.
  if [[ -n "$moto_pid" ]] && kill -0 "$moto_pid" 2>/dev/null; then
    kill "$moto_pid"
    wait "$moto_pid" 2>/dev/null || true
  fi
  rm -rf "$package_dir"
}
trap cleanup EXIT

# Tools ---------------------------------------------------------------------------------

if [[ ! -x node_modules/.bin/serverless ]]; then
  echo "check-stack: installing node packages with npm ci"
  npm ci --no-audit --no-fund
fi

tools_python() {
  if [[ ! -x "$tools_venv/bin/python" ]]; then
    echo "check-stack: creating the tools venv $tools_venv" >&2
    python3 -m venv "$tools_venv"
    "$tools_venv/bin/pip" install --quiet --upgrade pip >&2
  fi
  echo "$tools_venv/bin/python"
}

# checkov pins its own versions of boto3 and cfn-lint, so it lives apart from .venv.
if [[ ! -x "$tools_venv/bin/checkov" ]]; then
  "$(tools_python)" -m pip install --quiet "checkov==$checkov_version"
fi
checkov="$tools_venv/bin/checkov"

# cfn-lint, moto's server and boto3 for the deploy rehearsal: .venv first.
if [[ -x .venv/bin/cfn-lint && -x .venv/bin/moto_server ]]; then
  python_bin=.venv/bin/python
  cfn_lint=.venv/bin/cfn-lint
  moto_server=.venv/bin/moto_server
else
  python_bin="$(tools_python)"
  if [[ ! -x "$tools_venv/bin/moto_server" ]]; then
    "$python_bin" -m pip install --quiet 'moto[server]>=5.2,<6' 'boto3>=1.34' 'pyyaml>=6.0'
  fi
  cfn_lint="$tools_venv/bin/cfn-lint"
  moto_server="$tools_venv/bin/moto_server"
fi

# 1. Package -----------------------------------------------------------------------------

echo "check-stack: packaging stage '$stage' into $package_dir"
started=$SECONDS
npx --no-install serverless package --stage "$stage" --package "$package_dir" --param "modelsBucket=$models_bucket"
echo "check-stack: packaged in $((SECONDS - started)) s"

if [[ ! -f "$template" ]]; then
  echo "check-stack: $template was not written; see the packaging output above" >&2
  exit 1
fi

oversized=0
for archive in "$package_dir"/*.zip; do
  unzipped_bytes="$("$python_bin" -c 'import sys, zipfile; print(sum(entry.file_size for entry in zipfile.ZipFile(sys.argv[1]).infolist()))' "$archive")"
  zipped_bytes="$("$python_bin" -c 'import os, sys; print(os.path.getsize(sys.argv[1]))' "$archive")"
  echo "check-stack: $(basename "$archive"): $((unzipped_bytes / 1048576)) MiB unzipped" \
       "($unzipped_bytes bytes), $((zipped_bytes / 1048576)) MiB zipped"
  if (( unzipped_bytes > max_unzipped_bytes )); then
    echo "check-stack: $archive is over Lambda's unzipped limit of $max_unzipped_bytes bytes" >&2
    oversized=1
  fi
done
if (( oversized )); then
  exit 1
fi

# numpy and scipy wheels built for the wrong machine would fail at import inside Lambda.
"$python_bin" scripts/check_package_platform.py "$template" "$package_dir"/*.zip

# 2. Lint --------------------------------------------------------------------------------

echo "check-stack: running $("$cfn_lint" --version) on the template"
# No rule is suppressed. moto's CloudFormation runs cfn-lint itself and rejects a template
# with any finding, warnings included, so the rehearsal below needs a clean template too.
if ! "$cfn_lint" -- "$template"; then
  echo "check-stack: cfn-lint reported the findings above" >&2
  exit 1
fi
echo "check-stack: cfn-lint found no errors or warnings"

# Each suppressed checkov finding, and why it does not apply to this stack:
skipped_checks=(
  # The VPC network-interface actions that Lambda needs for a VPC function
  # (ec2:CreateNetworkInterface and friends) accept no resource ARN. Every other statement
  # in the roles names its queue, table, log group or file system.
  CKV_AWS_111
  # Concurrency is capped per queue by the event source mappings' maximumConcurrency.
  # Reserved concurrency would also take that many from the account's pool (10 on a new
  # account) and can make the deploy fail.
  CKV_AWS_115
  # A function dead-letter queue receives failed asynchronous invocations only. These
  # functions are invoked synchronously by SQS, and each queue redrives to its own
  # dead-letter queue after maxReceiveCount receives.
  CKV_AWS_116
  # The table is encrypted at rest with the AWS managed key (SSESpecification). It contains
  # job state and metrics, and a customer managed key would add cost and a key policy.
  CKV_AWS_119
  # CloudWatch Logs encrypts log data at rest by default. The logs hold ids and metrics.
  CKV_AWS_158
  # The environment contains resource names and settings, no secrets. Lambda encrypts it at
  # rest with its own key.
  CKV_AWS_173
  # The framework's deployment bucket contains only deployment artifacts, and the models
  # bucket only copies of models that the aggregator's role writes. Access logging would
  # need a further bucket.
  CKV_AWS_18
  # CloudWatch alarms cannot publish to a topic encrypted with the AWS managed SNS key,
  # only with a customer managed key. The alarm messages carry queue names only.
  CKV_AWS_26
  # The queues use SQS-managed server-side encryption (SqsManagedSseEnabled: true).
  # checkov 3.3 accepts only KmsMasterKeyId as encryption for this check.
  CKV_AWS_27
)
skip_list="$(IFS=,; echo "${skipped_checks[*]}")"
echo "check-stack: running checkov $("$checkov" --version) on the template (skipping $skip_list)"
# --skip-download keeps checkov from calling its vendor's API.
if ! "$checkov" --quiet --compact --skip-download --framework cloudformation \
     --skip-check "$skip_list" -f "$template"; then
  echo "check-stack: checkov reported the findings above" >&2
  exit 1
fi
echo "check-stack: checkov found nothing beyond the suppressed checks"

# 3. Deploy rehearsal --------------------------------------------------------------------

port="$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
moto_log="$package_dir/moto.log"
"$moto_server" -H 127.0.0.1 -p "$port" >"$moto_log" 2>&1 &
moto_pid=$!
export AWS_ENDPOINT_URL="http://127.0.0.1:$port"

for _ in $(seq 1 50); do
  if "$python_bin" -c "import urllib.request; urllib.request.urlopen('$AWS_ENDPOINT_URL/moto-api/')" 2>/dev/null; then
    break
  fi
  sleep 0.2
done

echo "check-stack: deploying stage '$stage' into the moto server at $AWS_ENDPOINT_URL (pid $moto_pid)"
started=$SECONDS
if ! npx --no-install serverless deploy --stage "$stage" --package "$package_dir" --param "modelsBucket=$models_bucket"; then
  echo "check-stack: the deploy into moto failed; the server's log follows" >&2
  tail -n 40 "$moto_log" >&2
  exit 1
fi
echo "check-stack: deployed in $((SECONDS - started)) s"

"$python_bin" scripts/verify_deployment.py --stage "$stage" --models-bucket "$models_bucket" --remove-mappings

echo "check-stack: all checks passed in $((SECONDS - script_started)) s"
