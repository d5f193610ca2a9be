"""The front door: gRPC and OpenAI HTTP servers, admin operations, replica pool and router,
auth, and the one error table."""
