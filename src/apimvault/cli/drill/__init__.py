"""``apimvault drill``: the rotation drill under live traffic."""
