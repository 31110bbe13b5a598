"""The course around the package: its settings per profile (`settings`), its plan on this machine (`plan`), and
the runner that executes the notebooks in order with papermill (`runner`, `python -m alphagan course`)."""
