"""``python -m funad``: the ``funad`` command, also for launchers such as
``torchrun --nproc_per_node=N -m funad extract DATA -o CACHE``."""

if __name__ == "__main__":
    from funad.cli.main import main  # the CLI lives outside the algorithm package; imported only when run

    main()
