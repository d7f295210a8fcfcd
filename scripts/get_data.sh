#!/usr/bin/env bash
# Makes real Fashion-MNIST available where Debian's package can be installed; otherwise the
# quickstart falls back to scikit-learn's bundled digits (the spec chooses, see experiments/quickstart.yaml).
set -uo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST found in $dir"
    exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    if $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
        echo "installed Fashion-MNIST into $dir"
        exit 0
    fi
fi
echo "Fashion-MNIST could not be installed (needs apt-get and root); the quickstart will use the digits data set"
exit 0
