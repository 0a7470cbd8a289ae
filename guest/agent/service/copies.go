package service

import (
	"context"

	"github.com/containerd/log"
	"google.golang.org/protobuf/types/known/emptypb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/guest/agent/copies"
)

// UpdateCopiedMount brings the pod's copy of a host bind mount source to its
// new content (copies.UpdateTree).
func (s containersService) UpdateCopiedMount(ctx context.Context, req *agent.UpdateCopiedMountRequest) (*emptypb.Empty, error) {
	if err := s.a.copies.Update(req.GetKey(), filesOf(req.GetFiles())); err != nil {
		return nil, err
	}
	log.G(ctx).WithField("key", req.GetKey()).WithField("files", len(req.GetFiles())).Debug("copied mount updated")
	return &emptypb.Empty{}, nil
}

// filesOf converts a copied tree of the API.
func filesOf(fs []*agent.CopiedFile) []copies.File {
	files := make([]copies.File, len(fs))
	for i, f := range fs {
		files[i] = copies.File{Path: f.GetPath(), Mode: f.GetMode(), UID: f.GetUid(), GID: f.GetGid(), Data: f.GetData(), Link: f.GetLink()}
	}
	return files
}
