"""llm-ha: keep a self-hosted LLM service available under traffic spikes.

    mitmdump --mode reverse:http://127.0.0.1:8001 -s addons/llm_ha.py \
        --set llm_ha_profile=profiles/local-two-upstreams.yaml

The code lives in the `llmha` package beside this script (mitmproxy puts the script's folder on
sys.path); see README.md. The addons, one per concern, are listed in `llmha/chain.py`, as mitmproxy's
`default_addons()` lists its own; an installed package has the same script (`llm-ha script-path`).
"""

from llmha.chain import make_addons

addons = make_addons()
