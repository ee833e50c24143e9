"""Reports: what a person reads. The HTML report, latent dashboards, the notebook explorer and the
plotly figures (returned, never shown).

May import: every library subpackage (analyses and below); never stories or cli.
"""
