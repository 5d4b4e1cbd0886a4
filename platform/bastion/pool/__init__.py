"""GPU catalog, pool inventory and the capacity planner (`bastion plan`); placement onto Ray resources comes later."""
