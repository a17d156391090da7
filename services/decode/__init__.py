"""The decode worker (`tandem serve --disaggregation-mode decode`) and the unified worker
(`--disaggregation-mode null`): a gRPC GenerateService over one engine."""
