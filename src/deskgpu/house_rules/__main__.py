"""`python -m deskgpu.house_rules`: print docs/house-rules.md's pod_config allow-list
section (`python -m deskgpu.docs` writes it there)."""

from deskgpu.house_rules.podspec import readme_section

print(readme_section(), end="")
