"""``python -m regmirror.cli``: the ``regmirror`` console script."""

from regmirror.cli.main import main

main()
