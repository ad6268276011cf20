"""State shared by several llm-ha instances through Redis (`shared_state` in the profile).

Imported only when a profile sets `shared_state`: without it nothing here is loaded.
"""
