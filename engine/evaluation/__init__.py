"""Quality and temporal structure: the FIS probe, fidelity harness, video metrics, plots."""
