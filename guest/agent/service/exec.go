package service

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/emptypb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/guest/agent/sandbox"
)

type execService struct{ a *Agent }

var _ agent.ExecService = execService{}

func (s execService) Create(ctx context.Context, req *agent.CreateExecRequest) (*emptypb.Empty, error) {
	c, err := s.a.runtime.Get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	var p specs.Process
	if err := json.Unmarshal(req.GetProcess(), &p); err != nil {
		return nil, fmt.Errorf("exec %s: process: %v: %w", req.GetExecId(), err, errdefs.ErrInvalidArgument)
	}
	sandbox.AdjustProcess(&p)
	if _, err := c.CreateExec(ctx, req.GetExecId(), &p, stdioOf(req.GetStdio())); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s execService) Start(ctx context.Context, req *agent.StartExecRequest) (*agent.StartExecResponse, error) {
	c, err := s.a.runtime.Get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	p, err := c.StartExec(ctx, req.GetExecId())
	if err != nil {
		return nil, err
	}
	return &agent.StartExecResponse{Pid: uint32(p.Pid())}, nil
}

func (s execService) Delete(ctx context.Context, req *agent.DeleteExecRequest) (*agent.DeleteExecResponse, error) {
	c, err := s.a.runtime.Get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	e, err := c.DeleteExec(req.GetExecId())
	if err != nil {
		return nil, err
	}
	s.a.forgetStdio(req.GetContainerId(), req.GetExecId(), false)
	return &agent.DeleteExecResponse{Exit: exitStatus(e)}, nil
}
