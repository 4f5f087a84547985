"""Joins a job through pdcnno_jax.distributed and prints the TCP ports this process listens on.

Run by test_launch_local under the local launcher: after one cross-process all-gather (so
that gloo has opened its listener), it prints ``listeners=[(address, port), ...]`` read from
/proc (this process's sockets only), then meets the others once more before exiting.
"""

import argparse
import ipaddress
import os


def _address(hex_address: str) -> str:
  """An address of /proc/net/tcp{,6} (little-endian 32-bit words) as text."""
  raw = bytes.fromhex(hex_address)
  address = ipaddress.ip_address(b''.join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
  return str(getattr(address, 'ipv4_mapped', None) or address)


def listeners() -> list[tuple[str, int]]:
  """(address, port) of every listening TCP socket this process holds."""
  inodes = set()
  for fd in os.listdir('/proc/self/fd'):
    try:
      target = os.readlink(f'/proc/self/fd/{fd}')
    except OSError:
      continue
    if target.startswith('socket:['):
      inodes.add(target[len('socket:['):-1])
  found = []
  for table in ('/proc/net/tcp', '/proc/net/tcp6'):
    if not os.path.exists(table):
      continue
    with open(table) as f:
      for line in f.readlines()[1:]:
        fields = line.split()
        if fields[3] == '0A' and fields[9] in inodes:  # 0A: LISTEN.
          address, port = fields[1].split(':')
          found.append((_address(address), int(port, 16)))
  return sorted(found)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  args = parser.parse_args()
  from pdcnno_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.process_allgather(jnp.ones(2))
  print(f'listeners={listeners()}', flush=True)
  multihost_utils.process_allgather(jnp.ones(2))


if __name__ == '__main__':
  main()
