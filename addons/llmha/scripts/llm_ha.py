"""llm-ha's mitmproxy entry script, from the installed package:

    mitmproxy -s "$(llm-ha script-path)" --set llm_ha_profile=profiles/local-two-upstreams.yaml

The same as the repository's addons/llm_ha.py; the addons are listed in llmha/chain.py.
"""

from llmha.chain import make_addons

addons = make_addons()
