module lockstep.dev/tests/push_service

go 1.24
