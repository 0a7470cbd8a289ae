module github.com/caisson-containers/caisson

go 1.26.6
