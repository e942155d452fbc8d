"""group: VMs protected together.

* :mod:`ftd.group.lease` elects one synchronizer per group (a lease record on the bus);
* :mod:`ftd.group.epoch` is the coordinated checkpoint epoch barrier (propose, ack, commit);
* :mod:`ftd.group.policy` decides what the other members do when one fails over;
* :mod:`ftd.group.messages` are the wire kinds on ``group/{group}/...`` topics;
* :mod:`ftd.group.sync` is the I/O side: the daemon's ``group-sync`` task.

Everything but ``sync`` is pure. See docs/groups.md for the design and its limits.
"""
