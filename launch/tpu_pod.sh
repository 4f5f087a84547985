#!/bin/bash
# Cloud TPU pod slice: the same command on every host; jax.distributed.initialize()
# auto-detects the pod topology (pdcnno_jax/distributed.py, --distributed=on).
#
#   TPU=my-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh configs/vgg16_imagenet_subset.py \
#       gs://my-bucket/workdirs/vgg16_in10
#
# Every host needs the repository and its requirements (plus jax[tpu]) at ~/pdcnno_jax, and
# the TFDS data_dir must be readable by all hosts (e.g. --config.data.data_dir=gs://...).
# Worker 0's JAX coordination service (no authentication) listens on every interface of the
# VPC network; restrict its port with firewall rules to the pod's hosts.
set -euo pipefail
config="${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}"
workdir="${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}"
shift 2
gcloud compute tpus tpu-vm ssh "${TPU:?set TPU}" --zone="${ZONE:?set ZONE}" --worker=all \
  --command="cd ~/pdcnno_jax && .venv/bin/python -m pdcnno_jax.main --config=${config} \
             --workdir=${workdir} --distributed=on $*"
