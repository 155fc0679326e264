"""torch modules, one concept per file. They take resolved numbers from the plan and never
re-derive shapes; tokens flow channels-last, ``(B, H, W, C)`` for the grid layout."""
