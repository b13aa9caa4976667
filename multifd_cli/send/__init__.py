"""The send side: sources, dirty tracking, the clients and channels that read and frame pages, and the orchestrator that runs the passes."""
