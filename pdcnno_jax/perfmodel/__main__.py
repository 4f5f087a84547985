"""Entry point: python -m pdcnno_jax.perfmodel (see `cli`)."""

from pdcnno_jax.perfmodel import cli

if __name__ == '__main__':
  cli.main()
