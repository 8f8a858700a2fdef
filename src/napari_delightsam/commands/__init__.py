"""One module per `delightsam` subcommand (see ``napari_delightsam.cli``)."""
