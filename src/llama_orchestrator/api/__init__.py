"""HTTP front ends served by the daemon: the OpenAI-compatible router (``proxy``) and the control API."""
