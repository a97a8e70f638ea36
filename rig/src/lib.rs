//! Finds real KVM: the host's /dev/kvm or the nested QEMU rig, and runs payloads there.
