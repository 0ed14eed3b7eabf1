"""`python -m deskgpu.house_rules`: print the README's pod_config allow-list section."""

from deskgpu.house_rules.podspec import readme_section

print(readme_section(), end="")
