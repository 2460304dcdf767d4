"""iSCSI: the tgt target driver and the node's initiator side."""
