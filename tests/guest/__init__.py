"""vmapi's test guest: a bootable disk image built at test time, and its console's lines.

``build.ensure_guest_image()`` builds or finds the image (``guest_image`` fixture in
tests/conftest.py); ``console`` reads what the guest prints on its serial port.
"""
