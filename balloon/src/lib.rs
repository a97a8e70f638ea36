//! virtio-balloon device and host-side guest page accounting.
