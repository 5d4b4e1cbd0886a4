"""The control plane: admin API and web console behind Keycloak (OIDC) single sign-on, with roles.

`app.create_app` builds the FastAPI app; `command.control_app` is the `bastion control` CLI group.
"""
