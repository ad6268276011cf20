"""mitmproxy entry scripts shipped in the package (`llm-ha script-path`).

mitmproxy puts a script's folder on sys.path (and leaves it there), so this folder holds nothing
that could shadow another module: only the scripts.
"""
