#!/usr/bin/env bash
# Package the Serverless stack offline and lint the CloudFormation template it produces.
#
# Usage: scripts/check-stack.sh [STAGE]        (STAGE defaults to dev)
#
# Needs node and npm (node_modules is installed with `npm ci` when missing), a local
# python3 for serverless-python-requirements, and cfn-lint from .venv or PATH.
# No AWS account is used: the AWS variables are set to dummy values below.
# Exits non-zero when packaging fails, when cfn-lint reports an error or a warning,
# or when the unzipped deployment package is over Lambda's 250 MB limit.
set -euo pipefail

stage="${1:-dev}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# Dummy credentials and no instance metadata lookups, so nothing reaches a real account.
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
export SLS_TELEMETRY_DISABLED=1

# Lambda's limit for a function's code and layers, unzipped: 250 MB.
max_unzipped_bytes=262144000
template=.serverless/cloudformation-template-update-stack.json

if [[ ! -x node_modules/.bin/serverless ]]; then
  echo "check-stack: installing node packages with npm ci"
  npm ci --no-audit --no-fund
fi

if [[ -x .venv/bin/cfn-lint ]]; then
  cfn_lint=.venv/bin/cfn-lint
elif command -v cfn-lint >/dev/null 2>&1; then
  cfn_lint="$(command -v cfn-lint)"
else
  echo "check-stack: cfn-lint not found in .venv/bin or on PATH; install it with 'pip install cfn-lint'" >&2
  exit 1
fi

echo "check-stack: packaging stage '$stage'"
rm -rf .serverless
started=$SECONDS
npx --no-install serverless package --stage "$stage"
echo "check-stack: packaged in $((SECONDS - started)) s"

if [[ ! -f "$template" ]]; then
  echo "check-stack: $template was not written; see the packaging output above" >&2
  exit 1
fi

oversized=0
for archive in .serverless/*.zip; do
  # The last line of `unzip -l` is "<total bytes> <n> files".
  unzipped_bytes="$(unzip -l "$archive" | tail -n 1 | awk '{print $1}')"
  echo "check-stack: $archive: $((unzipped_bytes / 1048576)) MiB unzipped ($unzipped_bytes bytes)"
  if (( unzipped_bytes > max_unzipped_bytes )); then
    echo "check-stack: $archive is over Lambda's unzipped limit of $max_unzipped_bytes bytes" >&2
    oversized=1
  fi
done

echo "check-stack: running $("$cfn_lint" --version) on $template"
# No rule is suppressed. To suppress one, add `--ignore-checks RULE` here with a comment
# that explains why the finding does not apply.
if ! "$cfn_lint" -- "$template"; then
  echo "check-stack: cfn-lint reported the findings above in $template" >&2
  exit 1
fi
echo "check-stack: cfn-lint found no errors or warnings"

exit "$oversized"
