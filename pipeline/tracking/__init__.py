"""What a run records: MLflow stores and runs, input datasets and lineage, the callbacks that write curves and reports, and where each process spends its time."""
