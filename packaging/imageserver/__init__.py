# Licensed to the Apache Software Foundation (ASF) under the Apache License,
# Version 2.0; see /usr/share/doc/cloudstack-image-server/copyright.
"""cloudstack-image-server's stand-in for CloudStack's Python `imageserver`.

The CloudStack KVM agent starts its image server as
`python3 -m imageserver` from the directory in which it found
`imageserver/__main__.py`. This package is installed where the agent looks
first (/usr/share/cloudstack-agent/lib/scripts/vm/hypervisor/kvm/), so
`__main__` runs /usr/bin/cloudstack-image-server instead. Nothing here is
imported by anything else.
"""
