"""Block storage: /storage volumes, /storage_type rules, a VM's volumes on its node."""
