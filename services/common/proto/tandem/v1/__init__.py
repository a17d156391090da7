"""Generated gRPC stubs (services.common.protogen)."""
