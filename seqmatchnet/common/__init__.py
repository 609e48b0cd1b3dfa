"""What every part uses: the one error type, atomic file writes, devices and seeding, logging,
and the torchrun process group.
"""
